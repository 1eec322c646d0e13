"""Frozen fast inference path: `optimize_for_inference(model)` -> `FastSwin` (eval only).

What changes against the eval model (outputs agree within 1e-4 in fp32):

* Every constant is computed once. v1's bias table is gathered to `[heads, N, N]`,
  v2's CPB MLP is evaluated to `16 * sigmoid(...)`, v2's temperature is clamped and
  exponentiated, v2's q/v biases are concatenated; v1's attention scale is folded
  into the q rows of the qkv weight and bias. Shift masks are added to the bias into
  one `[num_windows, heads, N, N]` tensor per block and input size, built on the first
  call at that size and cached (`FastSwin.max_cached_sizes` sizes).
* Tokens live in *window layout* `[B, num_windows * N, C]` for the whole stage: the
  roll + pad + window partition of a block and the reverse + roll + crop of the block
  before it collapse into one `index_select`, patch merging gathers its 2x2 neighbours
  straight from the previous layout into the next stage's layout, and LayerNorm /
  MLP / residuals are per-token so they do not care about the order. Padded slots hold
  copies of a real token and are masked as keys exactly as the eval model masks its
  zero padding (`attention.PAD_MASK_VALUE`), so they never reach a real token.
* Attention is two batched matmuls around one in-place add of the bias+mask (broadcast
  over images) and a softmax; measured faster than the CPU SDPA kernel at these sizes.
* On CPU, linear layers run through oneDNN (`torch.ops.mkldnn._linear_pointwise`)
  with GELU and the residual add fused; oneDNN picks its kernels by instruction set,
  which is markedly faster than the default BLAS on AMD CPUs. Elsewhere (CUDA, ONNX
  export, torch.compile) plain `F.linear` is used.
* No dropout, drop path, gradient checkpointing or autograd state: weights are buffers.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import PAD_MASK_VALUE, SHIFT_MASK_VALUE, WindowAttentionV1, WindowAttentionV2
from ..models.swin import SwinTransformer

__all__ = ["FastSwin", "optimize_for_inference"]

# The order patch merging concatenates a 2x2 neighbourhood in (official): TL, BL, TR, BR as (row, col) offsets.
MERGE_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))


def optimize_for_inference(model: SwinTransformer, *, dtype: torch.dtype | None = None,
                           use_onednn: bool | None = None, compile: bool = False) -> nn.Module:
    """A frozen, eval-only copy of `model` that computes the same logits faster (see module docstring).

    `model` is not modified. `dtype` casts the copy (fp32 by default; bf16/fp16 for CUDA).
    `use_onednn`: None = oneDNN linears on CPU when available. `compile=True` wraps the
    result in `torch.compile` (static shapes: one compilation per input size). Measured on
    an AVX-512 AMD CPU it is ~1.8x *slower* than the uncompiled fast path: inductor lowers the
    linears to the default BLAS instead of oneDNN; it is there for CUDA.
    Input `[B, in_chans, H, W]` of any size -> logits `[B, num_classes]`.
    """
    fast = FastSwin(model, use_onednn=use_onednn)
    if dtype is not None:
        fast = fast.to(dtype)
    if compile:
        # Inductor's SDPA pattern rewrite assumes 4-D attention and fails on [B, windows, heads, N, N].
        return torch.compile(fast, dynamic=False, options={"pattern_matcher": False})
    return fast


# ------------------------------------------------------------------------------------------ index maps
# Written with tensor arithmetic only (no Python branch on a size), so the same code builds
# the cached constants in eager mode and computes them inside an ONNX graph whose height
# and width are dynamic. Sizes may be ints or symbolic ints.
def _scalar(value, device) -> torch.Tensor:
    return torch.full((), value, dtype=torch.long, device=device)


def stage_shift(size, window: int, device=None) -> torch.Tensor:
    """Shift of a stage's odd blocks along one axis: window // 2 where the map is larger than
    the window, else 0 (the rule of `SwinStage.shifts_and_masks`). A 0-d long tensor."""
    return (_scalar(size, device) > window).long() * (window // 2)


def _region(rolled: torch.Tensor, padded: torch.Tensor, window: int, shift: torch.Tensor) -> torch.Tensor:
    """The official shift regions (0, 1, 2) along one axis of the rolled, padded map.
    Unshifted, this splits at a window edge, which no window straddles: no effect."""
    return (rolled >= padded - window).long() + (rolled >= padded - shift).long()


def window_layout(height, width, window: int, shift: tuple[torch.Tensor, torch.Tensor], device=None):
    """A block's window layout of a `height x width` map: the eval model's pad -> roll(-shift) ->
    window_partition order.

    Returns (token `[num_windows * N]`: the map token in each slot, -1 for padding;
    mask `[num_windows, N, N]`: the eval model's additive shift + padding mask).
    Built from 1-D aranges and broadcasting only (no reshape of a size-dependent grid), so
    a dynamic-shape export traces it without specialising the size.
    """
    windows_h, windows_w = (height + window - 1) // window, (width + window - 1) // window
    padded_h, padded_w = _scalar(windows_h * window, device), _scalar(windows_w * window, device)
    windows = torch.arange(windows_h * windows_w, device=device)[:, None]  # [num_windows, 1]
    tokens = torch.arange(window * window, device=device)[None, :]         # [1, N]
    windows_w = _scalar(windows_w, device)
    rolled_r = torch.div(windows, windows_w, rounding_mode="floor") * window + tokens // window  # [nW, N]
    rolled_c = torch.remainder(windows, windows_w) * window + tokens % window
    source_r = torch.remainder(rolled_r + shift[0], padded_h)
    source_c = torch.remainder(rolled_c + shift[1], padded_w)
    height, width = _scalar(height, device), _scalar(width, device)
    pad = (source_r >= height) | (source_c >= width)
    token = torch.where(pad, -1, source_r * width + source_c)
    region = _region(rolled_r, padded_h, window, shift[0]) * 3 + _region(rolled_c, padded_w, window, shift[1])
    mask = ((region[:, :, None] != region[:, None, :]).float() * SHIFT_MASK_VALUE
            + pad[:, None, :].float() * PAD_MASK_VALUE)
    return token.flatten(), mask


def token_slots(height, width, window: int, shift: tuple[torch.Tensor, torch.Tensor], device=None) -> torch.Tensor:
    """Inverse of `window_layout`: the slot holding each map token, `[height * width]`."""
    def rolled(size, shift_):
        padded = _scalar((size + window - 1) // window * window, device)
        return torch.remainder(torch.arange(size, device=device) - shift_, padded)
    rows, cols = rolled(height, shift[0]), rolled(width, shift[1])
    windows_w = _scalar((width + window - 1) // window, device)
    window_index = (rows[:, None] // window) * windows_w + cols[None, :] // window
    return (window_index * (window * window) + (rows[:, None] % window) * window + cols[None, :] % window).flatten()


def merge_index(source_slots: torch.Tensor, source_hw, layout: torch.Tensor, merged_width, device=None):
    """Patch merging as one gather: for each slot of the next stage's `layout`, the source slots of
    its 2x2 neighbours in `MERGE_OFFSETS` order, `[L * 4]`, and which of them are the merge's zero
    padding, `[L * 4, 1]` bool. Padded slots of `layout` merge token 0."""
    height, width = (_scalar(size, device) for size in source_hw)
    token = layout.clamp(min=0)
    merged_width = _scalar(merged_width, device)
    rows, cols = torch.div(token, merged_width, rounding_mode="floor") * 2, torch.remainder(token, merged_width) * 2
    rows = torch.stack([rows + dr for dr, _ in MERGE_OFFSETS], dim=1).flatten()
    cols = torch.stack([cols + dc for _, dc in MERGE_OFFSETS], dim=1).flatten()
    outside = (rows >= height) | (cols >= width)
    return source_slots[torch.where(outside, 0, rows * width + cols)], outside.unsqueeze(1)


@dataclass
class _BlockPlan:
    gather: torch.Tensor | None      # [L] slots of the previous layout, None = same layout
    attn_bias: torch.Tensor          # [num_windows or 1, heads, N, N]: bias + shift/pad mask


@dataclass
class _StagePlan:
    merge_gather: torch.Tensor | None  # [L * 4] for patch merging (stages > 0)
    merge_zero: torch.Tensor | None    # [L * 4, 1] bool: neighbours in the merge's zero padding
    blocks: list[_BlockPlan]


@dataclass
class _Plan:
    embed_gather: torch.Tensor | None  # patch grid -> stage 0 block 0 layout
    stages: list[_StagePlan]
    real_slots: torch.Tensor | None    # last layout: [L] real slots (eager) or [L, 1] 0/1 weights (symbolic)


# ---------------------------------------------------------------------------------------------- layers
def _fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool,
                 gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`act(x @ weight.T + bias) (+ residual)` over the last dim of `x`.

    oneDNN: one call with the GELU or residual add fused. Otherwise tokens are flattened to
    2-D first, which lets ONNX Runtime fuse MatMul + bias into one Gemm.
    """
    if onednn:
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    out = F.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    if gelu and torch.onnx.is_in_onnx_export():
        # Written in the order ONNX Runtime's GeluFusion matches (opset < 20 has no Gelu op).
        out = (out * 0.5) * (torch.erf(out / math.sqrt(2.0)) + 1.0)
    elif gelu:
        out = F.gelu(out)
    if residual is not None:
        out = out + residual
    return out


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor, num_heads: int,
                     tokens: int, logit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention inside windows. q, k, v `[B, num_windows * N, C]` in window layout (any strides;
    v1: the scale is already in q), attn_bias `[num_windows or 1, heads, N, N]` broadcast over
    images -> `[B, num_windows * N, C]`.

    `logit_scale` (`[heads, 1, 1]`) selects v2's cosine attention: unit q and k, q times the temperature.
    Plain batched matmuls beat the CPU flash-attention kernel here: windows are tiny (N = 49..256)
    and the mask differs per window, which that kernel can only take materialised per image.
    """
    batch, length, channels = q.shape
    head_dim = channels // num_heads

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # -> [B, num_windows, heads, N, head_dim]
        return t.reshape(batch, length // tokens, tokens, num_heads, head_dim).transpose(2, 3)
    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    if logit_scale is not None:
        q = q * (logit_scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12))
        k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
    attn = torch.matmul(q, k.transpose(-2, -1))
    attn += attn_bias
    out = torch.matmul(torch.softmax(attn, dim=-1), v)  # [B, num_windows, heads, N, head_dim]
    return out.transpose(2, 3).reshape(batch, length, channels)


class FastBlock(nn.Module):
    """One Swin block on tokens in window layout: `[B, num_windows * N, C]` -> same shape and layout.

    `split_qkv` keeps q, k and v as three weights (three Gemms in an ONNX graph, each its own
    initializer that INT8 quantization can find, and no Split copy); else one fused qkv weight.
    """

    def __init__(self, block, fast: "FastSwin", split_qkv: bool = False):
        super().__init__()
        attn = block.attn
        self.version = block.version
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.window = block.window
        self._fast = [fast]  # the owner's oneDNN switch, without registering a submodule cycle
        dim = attn.num_heads * attn.head_dim
        with torch.no_grad():
            qkv_weight = attn.qkv.weight.detach().clone()
            if isinstance(attn, WindowAttentionV1):
                qkv_bias = attn.qkv.bias.detach().clone() if attn.qkv.bias is not None else torch.zeros(3 * dim)
                scale = attn.head_dim ** -0.5  # SDPA's default scale, folded into q
                qkv_weight[:dim] *= scale
                qkv_bias[:dim] *= scale
                relative_bias = attn.relative_position_bias()
                logit_scale = torch.ones(attn.num_heads, 1, 1)
            else:
                assert isinstance(attn, WindowAttentionV2)
                if attn.q_bias is not None:
                    qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias)).detach()
                else:
                    qkv_bias = torch.zeros(3 * dim)
                relative_bias = attn.relative_position_bias()  # CPB MLP, 16 * sigmoid
                logit_scale = attn.logit_scale_value()
        buffers = {
            "norm1_weight": block.norm1.weight, "norm1_bias": block.norm1.bias,
            "norm2_weight": block.norm2.weight, "norm2_bias": block.norm2.bias,
            "proj_weight": attn.proj.weight, "proj_bias": attn.proj.bias,
            "fc1_weight": block.mlp.fc1.weight, "fc1_bias": block.mlp.fc1.bias,
            "fc2_weight": block.mlp.fc2.weight, "fc2_bias": block.mlp.fc2.bias,
            "relative_bias": relative_bias, "logit_scale": logit_scale,
        }
        self.split_qkv = split_qkv
        if split_qkv:
            for i, part in enumerate("qkv"):
                buffers[f"{part}_weight"] = qkv_weight[i * dim:(i + 1) * dim]
                buffers[f"{part}_bias"] = qkv_bias[i * dim:(i + 1) * dim]
        else:
            buffers.update(qkv_weight=qkv_weight, qkv_bias=qkv_bias)
        for name, value in buffers.items():
            self.register_buffer(name, value.detach().clone().contiguous())
        self.norm_eps = block.norm1.eps

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        onednn = self._fast[0].onednn_for(x)
        dim = x.shape[-1]
        y = F.layer_norm(x, (dim,), self.norm1_weight, self.norm1_bias, self.norm_eps) if self.version == 1 else x
        if self.split_qkv:
            q, k, v = (_fast_linear(y, weight, bias, onednn) for weight, bias in
                       ((self.q_weight, self.q_bias), (self.k_weight, self.k_bias), (self.v_weight, self.v_bias)))
        else:
            q, k, v = _fast_linear(y, self.qkv_weight, self.qkv_bias, onednn).split(dim, dim=-1)
        out = window_attention(q, k, v, attn_bias, self.num_heads, self.window * self.window,
                               self.logit_scale if self.version == 2 else None)
        if self.version == 1:
            x = _fast_linear(out, self.proj_weight, self.proj_bias, onednn, residual=x)
            hidden = _fast_linear(F.layer_norm(x, (dim,), self.norm2_weight, self.norm2_bias, self.norm_eps),
                                  self.fc1_weight, self.fc1_bias, onednn, gelu=True)
            return _fast_linear(hidden, self.fc2_weight, self.fc2_bias, onednn, residual=x)
        out = _fast_linear(out, self.proj_weight, self.proj_bias, onednn)
        x = x + F.layer_norm(out, (dim,), self.norm1_weight, self.norm1_bias, self.norm_eps)
        hidden = _fast_linear(x, self.fc1_weight, self.fc1_bias, onednn, gelu=True)
        out = _fast_linear(hidden, self.fc2_weight, self.fc2_bias, onednn)
        return x + F.layer_norm(out, (dim,), self.norm2_weight, self.norm2_bias, self.norm_eps)


class FastMerge(nn.Module):
    """Patch merging on gathered 2x2 neighbourhoods: `[B, L, 4C]` -> `[B, L, 2C]` (v1: norm then reduce;
    v2: reduce then norm)."""

    def __init__(self, merging, fast: "FastSwin"):
        super().__init__()
        self.version = merging.version
        self._fast = [fast]
        self.register_buffer("reduction_weight", merging.reduction.weight.detach().clone())
        self.register_buffer("norm_weight", merging.norm.weight.detach().clone())
        self.register_buffer("norm_bias", merging.norm.bias.detach().clone())
        self.norm_eps = merging.norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        onednn = self._fast[0].onednn_for(x)
        if self.version == 1:
            x = F.layer_norm(x, self.norm_weight.shape, self.norm_weight, self.norm_bias, self.norm_eps)
            return _fast_linear(x, self.reduction_weight, None, onednn)
        x = _fast_linear(x, self.reduction_weight, None, onednn)
        return F.layer_norm(x, self.norm_weight.shape, self.norm_weight, self.norm_bias, self.norm_eps)


class FastSwin(nn.Module):
    """Eval-only Swin v1/v2: `[B, in_chans, H, W]` (any H, W) -> `[B, num_classes]`.

    Built by `optimize_for_inference`; holds its weights as buffers (no parameters).
    Index maps and bias+mask tensors for an input size are built on the first call at
    that size and kept for the last `max_cached_sizes` sizes.
    """

    max_cached_sizes = 8
    symbolic_sizes = False  # set while exporting with dynamic height/width: constants are built in-graph

    def __init__(self, model: SwinTransformer, *, use_onednn: bool | None = None, split_qkv: bool = False):
        super().__init__()
        self.config = model.config
        self.name = model.name
        self.num_classes = model.num_classes
        self.version = model.config.version
        self.use_onednn = torch.backends.mkldnn.is_available() if use_onednn is None else use_onednn
        embed = model.patch_embed
        self.patch_size = embed.patch_size
        self.register_buffer("embed_weight", embed.proj.weight.detach().clone())
        self.register_buffer("embed_bias", embed.proj.bias.detach().clone())
        has_norm = isinstance(embed.norm, nn.LayerNorm)
        dim = model.config.embed_dim
        self.register_buffer("embed_norm_weight", embed.norm.weight.detach().clone() if has_norm else torch.ones(dim))
        self.register_buffer("embed_norm_bias", embed.norm.bias.detach().clone() if has_norm else torch.zeros(dim))
        self.embed_norm = has_norm
        self.embed_norm_eps = embed.norm.eps if has_norm else 1e-5
        self.windows = [stage.window for stage in model.layers]
        self.merges = nn.ModuleList(FastMerge(stage.downsample, self) if i > 0 else nn.Identity()
                                    for i, stage in enumerate(model.layers))
        self.stages = nn.ModuleList(nn.ModuleList(FastBlock(block, self, split_qkv) for block in stage.blocks)
                                    for stage in model.layers)
        self.register_buffer("norm_weight", model.norm.weight.detach().clone())
        self.register_buffer("norm_bias", model.norm.bias.detach().clone())
        self.norm_eps = model.norm.eps
        head = model.head.fc
        self.has_head = isinstance(head, nn.Linear)
        if self.has_head:
            self.register_buffer("head_weight", head.weight.detach().clone())
            self.register_buffer("head_bias", head.bias.detach().clone())
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self.eval()

    def train(self, mode: bool = True) -> "FastSwin":
        if mode:
            raise RuntimeError("FastSwin is inference-only; train the SwinTransformer it was built from")
        return super().train(False)

    def onednn_for(self, x: torch.Tensor) -> bool:
        return (self.use_onednn and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()))

    def _apply(self, fn, *args, **kwargs):
        self._plans.clear()  # device/dtype moves invalidate the cached constants
        return super()._apply(fn, *args, **kwargs)

    # ---------------------------------------------------------------------------------------- plans
    @torch.compiler.disable
    def plan(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> _Plan:
        """Index maps and attention bias+masks for a `height x width` patch grid (cached)."""
        key = (height, width, device, dtype)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = self._build_plan(height, width, device, dtype)
        self._plans[key] = plan
        while len(self._plans) > self.max_cached_sizes:
            self._plans.popitem(last=False)
        return plan

    def _build_plan(self, height, width, device, dtype, symbolic: bool = False) -> _Plan:
        """Every index map and bias+mask for a patch grid. `symbolic` (ONNX export with dynamic
        height/width): keep every step, even identities, since the sizes are unknown here."""
        def keep(index: torch.Tensor) -> torch.Tensor | None:
            identity = not symbolic and index.numel() == previous_slots.numel() and torch.equal(
                index, torch.arange(index.numel(), device=device))
            return None if identity else index

        stages: list[_StagePlan] = []
        previous_slots = torch.arange(height * width, device=device)  # row-major patch grid
        previous_hw = (height, width)
        embed_gather = layout = None
        for i, (window, blocks) in enumerate(zip(self.windows, self.stages)):
            if i > 0:
                height, width = (height + 1) // 2, (width + 1) // 2
            shifts = ((_scalar(0, device), _scalar(0, device)),
                      (stage_shift(height, window, device), stage_shift(width, window, device)))
            block_plans = []
            merge_gather = merge_zero = None
            # Even blocks share one layout and mask, odd blocks another, and so do the
            # gathers between them: build each once per stage (fewer nodes in an exported graph).
            layouts = [window_layout(height, width, window, shift, device) for shift in shifts[:min(len(blocks), 2)]]
            slots = [token_slots(height, width, window, shift, device) for shift in shifts[:len(layouts)]]
            gathers: dict[int, torch.Tensor | None] = {}
            for j, block in enumerate(blocks):
                layout, mask = layouts[j % 2]
                bias = block.relative_bias.unsqueeze(0)
                if symbolic or bool(mask.any()):
                    bias = bias + mask.unsqueeze(1).to(bias)
                gather = None
                if j == 0 and i == 0:
                    embed_gather = keep(previous_slots[layout.clamp(min=0)])
                elif j == 0:
                    merge_gather, merge_zero = merge_index(previous_slots, previous_hw, layout, width, device)
                    if not symbolic and not bool(merge_zero.any()):
                        merge_zero = None
                else:
                    if j % 2 not in gathers:
                        gathers[j % 2] = keep(previous_slots[layout.clamp(min=0)])
                    gather = gathers[j % 2]
                block_plans.append(_BlockPlan(gather, bias.to(dtype).contiguous()))
                previous_slots = slots[j % 2]
            previous_hw = (height, width)
            stages.append(_StagePlan(merge_gather, merge_zero, block_plans))
        real = layout >= 0
        if symbolic:
            real_slots = real.to(dtype).unsqueeze(1)
        else:
            real_slots = None if bool(real.all()) else torch.nonzero(real).flatten()
        return _Plan(embed_gather, stages, real_slots)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = (-images.shape[2]) % p, (-images.shape[3]) % p
        if self.symbolic_sizes or pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        x = F.conv2d(images, self.embed_weight, self.embed_bias, stride=p)  # [B, C, H/p, W/p]
        batch, dim, height, width = x.shape
        if self.symbolic_sizes:
            plan = self._build_plan(height, width, x.device, x.dtype, symbolic=True)
        else:
            plan = self.plan(height, width, x.device, x.dtype)
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C] view
        x = x.index_select(1, plan.embed_gather) if plan.embed_gather is not None else x.contiguous()
        if self.embed_norm:
            x = F.layer_norm(x, (dim,), self.embed_norm_weight, self.embed_norm_bias, self.embed_norm_eps)
        for merge, blocks, stage_plan in zip(self.merges, self.stages, plan.stages):
            if stage_plan.merge_gather is not None:
                x = x.index_select(1, stage_plan.merge_gather)
                if stage_plan.merge_zero is not None:
                    x = x.masked_fill(stage_plan.merge_zero, 0.0)
                x = merge(x.view(batch, -1, 4 * x.shape[-1]))
            for block, block_plan in zip(blocks, stage_plan.blocks):
                if block_plan.gather is not None:
                    x = x.index_select(1, block_plan.gather)
                x = block(x, block_plan.attn_bias)
        x = F.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias, self.norm_eps)
        if plan.real_slots is None:
            x = x.mean(dim=1)
        elif plan.real_slots.dtype == torch.long:
            x = x.index_select(1, plan.real_slots).mean(dim=1)
        else:  # 0/1 weights over slots: the mean over real tokens without a data-dependent shape
            x = (x * plan.real_slots).sum(dim=1) / plan.real_slots.sum()
        if not self.has_head:
            return x
        return F.linear(x, self.head_weight, self.head_bias)
