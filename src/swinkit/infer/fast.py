"""Frozen fast inference path: `FastSwin` (eval only), built by `infer.optimize.optimize_for_inference`.

The fast model runs the same block definition as the eval model (`models.swin.SwinBlock.forward_tokens`,
`models.attention.window_attention`); what changes is how (outputs agree within 1e-4 in fp32):

* Every constant is computed once (the policy `FrozenWindowAttention`): v1's bias table is
  gathered to `[heads, N, N]`, v2's CPB MLP is evaluated to `16 * sigmoid(...)`, v2's temperature
  is clamped and exponentiated, v2's q/v biases are concatenated. Shift/padding masks, index
  maps and the absolute position embedding resized to the patch grid (`ape`) are built once per
  input size and cached (`FastSwin.max_cached_sizes` sizes).
* Tokens stay in *window layout* `[B, num_windows * N, C]` for the whole stage: the eval model's
  `from_windows` of one block and `to_windows` of the next (roll + pad + partition) collapse into
  one `index_select` with a map derived from `models.attention.window_layout`, patch merging
  gathers its 2x2 neighbours straight from the previous layout into the next stage's layout
  (LayerNorm, MLP and residuals are per-token, so they do not care about the order). Padded
  slots hold copies of a real token and are masked as keys exactly as the eval model masks its
  zero padding, so they never reach a real token.
* On CPU, linear layers run through `swinkit.onednn.linear(frozen=True)`: oneDNN (fc1 with GELU
  fused) on the weight reordered once to its own layout (kept beside the model: one extra copy of
  each large weight) wherever oneDNN runs the shape (`onednn.uses_onednn`; `onednn.FIXED` says why it
  is not measured against MKL per shape); elsewhere (CUDA, ONNX export, torch.compile) plain `F.linear`
  on 2-D tokens (which ONNX Runtime fuses into one Gemm).
* Attention is `window_attention(fused=True)`: one call per block on strided head views of the
  qkv projection (no head-split or merge copies, no stored scores): swinkit's own kernel on the CPU
  in fp32 and bf16 for windows up to 8x8 (`swinkit.native`, built when the fast model is made), else
  `scaled_dot_product_attention`; exporters still see the plain batched matmuls.
* No dropout, drop path, gradient checkpointing or autograd state: parameters are frozen.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import native, onednn
from ..allocator import ensure_freed_memory_kept
from ..models.attention import WindowAttention, long_scalar, window_layout
from ..models.layers import MERGE_OFFSETS, Mlp, tracing
from ..models.registry import shift_size
from ..models.swin import SwinTransformer
from ..policy import specialise
from ..precision import ensure_denormals_flushed

__all__ = ["FastSwin"]


# ------------------------------------------------------------------------------------------ index maps
# Written with tensor arithmetic only (no Python branch on a size), so the same code builds
# the cached constants in eager mode and computes them inside an ONNX graph whose height
# and width are dynamic. Sizes may be ints or symbolic ints.
def token_slots(height, width, window: int, shift: tuple[torch.Tensor, torch.Tensor], device=None) -> torch.Tensor:
    """Inverse of `window_layout`: the slot holding each map token, `[height * width]`."""
    def rolled(size, shift_):
        padded = long_scalar((size + window - 1) // window * window, device)
        return torch.remainder(torch.arange(size, device=device) - shift_, padded)
    rows, cols = rolled(height, shift[0]), rolled(width, shift[1])
    windows_w = long_scalar((width + window - 1) // window, device)
    window_index = (rows[:, None] // window) * windows_w + cols[None, :] // window
    return (window_index * (window * window) + (rows[:, None] % window) * window + cols[None, :] % window).flatten()


def merge_index(source_slots: torch.Tensor, source_hw, layout: torch.Tensor, merged_width, device=None):
    """Patch merging as one gather: for each slot of the next stage's `layout`, the source slots of
    its 2x2 neighbours in `MERGE_OFFSETS` order, `[L * 4]`, and which of them are the merge's zero
    padding, `[L * 4, 1]` bool. Padded slots of `layout` merge token 0."""
    height, width = (long_scalar(size, device) for size in source_hw)
    token = layout.clamp(min=0)
    merged_width = long_scalar(merged_width, device)
    rows, cols = torch.div(token, merged_width, rounding_mode="floor") * 2, torch.remainder(token, merged_width) * 2
    rows = torch.stack([rows + dr for dr, _ in MERGE_OFFSETS], dim=1).flatten()
    cols = torch.stack([cols + dc for _, dc in MERGE_OFFSETS], dim=1).flatten()
    outside = (rows >= height) | (cols >= width)
    return source_slots[torch.where(outside, 0, rows * width + cols)], outside.unsqueeze(1)


# ------------------------------------------------------------------------------------- the policy
def _dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_onednn: bool,
           gelu: bool = False) -> torch.Tensor:
    """`x @ weight.T + bias` over the last dim: oneDNN (GELU fused when asked), or `F.linear` on 2-D
    tokens, which ONNX Runtime fuses into one Gemm (GELU then left to the caller)."""
    if use_onednn:
        return onednn.linear(x, weight, bias, gelu=gelu, frozen=True)
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class FastLinear:
    """`nn.Linear` for inference: oneDNN where `onednn.uses_onednn` allows it (and the owner allows
    oneDNN), else `F.linear` on 2-D tokens; `gelu=True` fuses the activation. `dense` is the one
    place the layer computes (`infer.int8` replaces it with oneDNN's int8 kernels)."""

    use_onednn = True

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        return self.dense(x, self.bias, gelu)

    def dense(self, x: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
        """`x @ weight.T + bias` (then GELU when asked) with this layer's weight and the given bias
        (the frozen attention passes its folded q/k/v bias)."""
        out = _dense(x, self.weight, bias, self.use_onednn, gelu)
        if gelu and self.use_onednn:
            return out
        if gelu and torch.onnx.is_in_onnx_export():
            # Written in the order ONNX Runtime's GeluFusion matches (opset < 20 has no Gelu op).
            return (out * 0.5) * (torch.erf(out / math.sqrt(2.0)) + 1.0)
        return F.gelu(out) if gelu else out


class FastMlp:
    """The MLP with GELU fused into fc1 (no dropout at inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, gelu=True))


class FrozenWindowAttention:
    """Window attention whose constants were computed once by `freeze`: v1's attention scale is
    folded into the q rows of the projection, v2's temperature and q/v bias are read from buffers,
    and the position bias is summed with each block's mask once per input size by `FastSwin.plan`
    (`attention_bias` of the plain module), which hands the sum to the block in place of the mask."""

    def freeze(self) -> None:
        with torch.no_grad():
            plain = super()
            self.register_buffer("frozen_bias", plain.relative_position_bias().detach().clone(), persistent=False)
            qkv_bias = plain.qkv_bias()
            weight = self.qkv.weight
            qkv_bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if qkv_bias is None else qkv_bias.clone()
            temperature = plain.temperature()
            if not self.cosine:  # a constant scale: fold it into q = x W_q^T + b_q
                dim = weight.shape[0] // 3
                weight[:dim] *= temperature
                qkv_bias[:dim] *= temperature
                temperature = torch.ones(())
            self.register_buffer("frozen_qkv_bias", qkv_bias.detach(), persistent=False)
            self.register_buffer("frozen_temperature", temperature.detach().clone(), persistent=False)

    def frozen_attention_bias(self, mask: torch.Tensor | None) -> torch.Tensor:
        """What the block receives in place of `mask`: the plain module's `attention_bias` of the
        frozen position bias, `[num_windows or 1, heads, N, N]`."""
        return WindowAttention.attention_bias(self, mask)

    def attention_bias(self, attn_bias: torch.Tensor) -> torch.Tensor:
        return attn_bias

    def relative_position_bias(self) -> torch.Tensor:
        return self.frozen_bias

    fused_attention = True  # one scaled_dot_product_attention call per block (plain matmuls under exporters)
    split_qkv = False  # three projections (ONNX export: three Gemms whose weights INT8 finds, no Split)

    def project_qkv(self, x):
        qkv, bias = self.qkv, self.frozen_qkv_bias
        if self.split_qkv:
            return tuple(_dense(x, w, b, qkv.use_onednn) for w, b in zip(qkv.weight.chunk(3), bias.chunk(3)))
        return qkv.dense(x, bias).chunk(3, dim=-1)

    def temperature(self):
        return 1.0 if not self.cosine else self.frozen_temperature


@dataclass
class _BlockPlan:
    gather: torch.Tensor | None      # [L] slots of the previous layout, None = same layout
    attn_bias: torch.Tensor          # [num_windows or 1, heads, N, N]: position bias + shift/padding mask


@dataclass
class _StagePlan:
    merge_gather: torch.Tensor | None  # [L * 4] for patch merging (stages > 0)
    merge_zero: torch.Tensor | None    # [L * 4, 1] bool: neighbours in the merge's zero padding
    blocks: list[_BlockPlan]


@dataclass
class _Plan:
    position: torch.Tensor | None      # [1, h * w, C] absolute position embedding at this patch grid (ape)
    embed_gather: torch.Tensor | None  # patch grid -> stage 0 block 0 layout
    stages: list[_StagePlan]
    real_slots: torch.Tensor | None    # last layout: [L] real slots (eager) or [L, 1] 0/1 weights (symbolic)


class FastSwin(nn.Module):
    """Eval-only Swin v1/v2: `[B, in_chans, H, W]` (any H, W) -> `[B, num_classes]`.

    Built by `optimize_for_inference`: a frozen copy of the model with the fast policy applied
    (`model`), run stage by stage in window layout. Index maps and masks for an input size are
    built on the first call at that size and kept for the last `max_cached_sizes` sizes.
    """

    max_cached_sizes = 8
    symbolic_sizes = False  # set while exporting with dynamic height/width: constants are built in-graph

    def __init__(self, model: SwinTransformer, *, use_onednn: bool | None = None, split_qkv: bool = False):
        super().__init__()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.config = model.config
        self.name = model.name
        self.num_classes = model.num_classes
        use_onednn = torch.backends.mkldnn.is_available() if use_onednn is None else use_onednn
        for module in self.model.modules():
            if isinstance(module, nn.Linear):
                specialise(module, FastLinear).use_onednn = use_onednn
            elif isinstance(module, Mlp):
                specialise(module, FastMlp)
            elif isinstance(module, WindowAttention):
                specialise(module, FrozenWindowAttention).freeze()
                module.split_qkv = split_qkv
        self.windows = [stage.window for stage in self.model.layers]
        if any(p.device.type == "cpu" for p in self.model.parameters()):
            native.kernels_available()  # build (once per machine) now rather than in the first forward
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self.eval()

    def train(self, mode: bool = True) -> "FastSwin":
        if mode:
            raise RuntimeError("FastSwin is inference-only; train the SwinTransformer it was built from")
        return super().train(False)

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
        """Every index map, bias+mask and the position embedding for a patch grid. `symbolic` (ONNX export
        with dynamic height/width): keep every step, even identities, since the sizes are unknown here."""
        def keep(index: torch.Tensor) -> torch.Tensor | None:
            identity = not symbolic and index.numel() == previous_slots.numel() and torch.equal(
                index, torch.arange(index.numel(), device=device))
            return None if identity else index

        position = self.model.position_embedding(height, width)
        position = None if position is None else position.to(dtype).contiguous()
        stages: list[_StagePlan] = []
        previous_slots = torch.arange(height * width, device=device)  # row-major patch grid
        previous_hw = (height, width)
        embed_gather = layout = None
        for i, (window, stage) in enumerate(zip(self.windows, self.model.layers)):
            blocks = stage.blocks
            if i > 0:
                height, width = (height + 1) // 2, (width + 1) // 2
            shifts = ((long_scalar(0, device), long_scalar(0, device)),
                      (shift_size(long_scalar(height, device), window), shift_size(long_scalar(width, device), window)))
            block_plans = []
            merge_gather = merge_zero = None
            # Even blocks share one layout and mask, odd blocks another, and so do the
            # gathers between them: build each once per stage (fewer nodes in an exported graph).
            layouts = [window_layout(height, width, window, shift, device) for shift in shifts[:min(len(blocks), 2)]]
            slots = [token_slots(height, width, window, shift, device) for shift in shifts[:len(layouts)]]
            gathers: dict[int, torch.Tensor | None] = {}
            for j, block in enumerate(blocks):
                layout, mask = layouts[j % 2]
                mask = mask.to(dtype) if symbolic or bool(mask.any()) else None
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
                block_plans.append(_BlockPlan(gather, block.attn.frozen_attention_bias(mask).to(dtype).contiguous()))
                previous_slots = slots[j % 2]
            previous_hw = (height, width)
            stages.append(_StagePlan(merge_gather, merge_zero, block_plans))
        real = layout >= 0
        if symbolic:
            real_slots = real.to(dtype).unsqueeze(1)
        else:
            real_slots = None if bool(real.all()) else torch.nonzero(real).flatten()
        return _Plan(position, embed_gather, stages, real_slots)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, in_chans, H, W]` of any float dtype (cast to the model's) -> fp32 logits `[B, num_classes]`."""
        model = self.model
        if images.device.type == "cpu" and not tracing():
            ensure_denormals_flushed()  # the shift mask's softmax weights: ~1e-44, slow unless flushed
            ensure_freed_memory_kept()  # large activations reuse mapped memory (no fresh zeroed pages)
        x = model.patch_embed(images.to(model.patch_embed.proj.weight.dtype))  # [B, H/p, W/p, C]
        batch, height, width, dim = x.shape
        if self.symbolic_sizes:
            plan = self._build_plan(height, width, x.device, x.dtype, symbolic=True)
        else:
            plan = self.plan(height, width, x.device, x.dtype)
        x = model.add_position_embedding(x, plan.position)
        x = x.reshape(batch, height * width, dim)
        if plan.embed_gather is not None:
            x = x.index_select(1, plan.embed_gather)
        for stage, stage_plan in zip(model.layers, plan.stages):
            if stage_plan.merge_gather is not None:
                x = x.index_select(1, stage_plan.merge_gather)
                if stage_plan.merge_zero is not None:
                    x = x.masked_fill(stage_plan.merge_zero, 0.0)
                x = stage.downsample.reduce(x.view(batch, -1, 4 * x.shape[-1]))
            for block, block_plan in zip(stage.blocks, stage_plan.blocks):
                if block_plan.gather is not None:
                    x = x.index_select(1, block_plan.gather)
                x = block.forward_tokens(x, block_plan.attn_bias)
        x = model.norm(x)
        if plan.real_slots is None:
            x = x.mean(dim=1)
        elif plan.real_slots.dtype == torch.long:
            x = x.index_select(1, plan.real_slots).mean(dim=1)
        else:  # 0/1 weights over slots: the mean over real tokens without a data-dependent shape
            x = (x * plan.real_slots).sum(dim=1) / plan.real_slots.sum()
        return model.head.fc(x).float()
