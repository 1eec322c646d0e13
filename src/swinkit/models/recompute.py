"""Block recomputation in slices of the batch: a recomputed block keeps only its input.

`torch.utils.checkpoint` recomputes a whole block for the whole batch in backward, so while
one block runs backward all its activations exist at once for every image: for Swin's first
stage that is as much memory per image as storing two blocks, and the batch that fits grows
only ~2x. `recompute_block` runs the block's forward and backward over slices of the batch
instead (every Swin block treats images independently: LayerNorm over channels, attention
within windows, drop path per sample), so what recomputation adds is bounded by the slice,
not the batch. It also skips work backward does not need: v1's last matmul (fc2) is never
recomputed, its gradients come from the stored-nothing formula `g^T gelu(h)` directly.

Results equal plain training: drop-path masks are drawn once for the batch, in the order the
plain forward draws them, and reused by every slice; the autocast state of the forward is
restored for the recomputation. Only the summation order of weight gradients over slices
differs (fp32 rounding). Blocks with dropout inside fall back to `torch.utils.checkpoint`
(elementwise random masks cannot be re-drawn slice by slice).
"""
from __future__ import annotations

import torch

from ..allocator import reuse_freed_memory

# A slice holds about this many block-input elements (tokens x channels): ~4 MB of fp32 per tensor
# of the block's width; recomputing it materialises ~20 such tensors (qkv, fc1's 4C output, grads).
SLICE_ELEMENTS = 1 << 20


def slice_images(tokens_per_image: int, channels: int, elements: int | None = None) -> int:
    """Images per recomputed slice for a block whose input holds `tokens_per_image x channels` values."""
    elements = SLICE_ELEMENTS if elements is None else elements
    return max(1, elements // max(tokens_per_image * channels, 1))


class _RecomputeBlock(torch.autograd.Function):
    """forward(block, shift, mask, x, *params) -> block(x), saving x (and drop-path masks) only.

    The parameters are inputs so that autograd hands out their gradients once per step, summed
    over the slices (what DDP's gradient hooks expect)."""

    @staticmethod
    def forward(ctx, block, shift, mask, x, *params):
        device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        keep = block.drop_path_masks(x)
        step = slice_images(x[0].numel() // x.shape[-1], x.shape[-1])
        if step >= x.shape[0]:
            out = block.forward_without_grad(x, shift, mask, keep)
        else:
            out = torch.empty_like(x)  # slices' temporaries are reused, the output is not
            with reuse_freed_memory():
                _forward_slices(block, x, shift, mask, keep, step, out)
        ctx.block, ctx.shift, ctx.step = block, shift, step
        ctx.has_keep = [k is not None for k in keep]
        ctx.save_for_backward(x, mask, *(k for k in keep if k is not None))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, *kept = ctx.saved_tensors
        kept = iter(kept)
        keep = tuple(next(kept) if has else None for has in ctx.has_keep)
        block = ctx.block
        params = [p for p in block.parameters() if p.requires_grad]  # the order forward was given
        whole = ctx.step >= x.shape[0]
        # Allocated before the slice loop's heap reuse: it outlives the loop.
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[3] and not whole else None
        with reuse_freed_memory():
            grad_x, grads = _backward_slices(ctx, x, mask, keep, grad_out, params, grad_x)
        return (None, None, None, grad_x, *grads)


def _forward_slices(block, x, shift, mask, keep, step: int, out: torch.Tensor) -> None:
    for start in range(0, x.shape[0], step):
        end = min(start + step, x.shape[0])
        out[start:end] = block.forward_without_grad(x[start:end], shift, mask, _slice(keep, start, end))


def _backward_slices(ctx, x, mask, keep, grad_out, params, grad_x):
    """Recompute and backpropagate slice by slice: (grad of x, grads of params summed over slices).
    `grad_x` is the preallocated input gradient when the batch spans several slices."""
    block, whole, wants_x = ctx.block, ctx.step >= x.shape[0], ctx.needs_input_grad[3]
    enabled, dtype = ctx.autocast
    grads: list[torch.Tensor | None] = [None] * len(params)
    for start in range(0, x.shape[0], ctx.step):
        end = min(start + ctx.step, x.shape[0])
        part = x[start:end].detach().requires_grad_(wants_x)
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            outputs, grad_outputs, direct = block.recompute_for_backward(
                part, ctx.shift, mask, _slice(keep, start, end), grad_out[start:end])
        found = list(torch.autograd.grad(outputs, ([part] if wants_x else []) + params, grad_outputs,
                                         allow_unused=True))
        if wants_x and whole:
            grad_x = found.pop(0)
        elif wants_x:
            grad_x[start:end] = found.pop(0)
        for i, (param, grad) in enumerate(zip(params, found)):
            if grad is None:
                grad = direct.get(id(param))
            if grad is not None:
                grads[i] = grad if grads[i] is None else grads[i].add_(grad)
        del outputs, grad_outputs, direct, found
    return grad_x, grads


def _slice(keep, start: int, end: int):
    return tuple(None if k is None else k[start:end] for k in keep)


def recompute_block(block, x: torch.Tensor, shift, mask) -> torch.Tensor:
    """`block(x)` keeping only `x` for backward (see the module docstring). The block provides
    `drop_path_masks(x)`, `forward_without_grad(x, shift, mask, keep)` and
    `recompute_for_backward(x, shift, mask, keep, grad_out) -> (outputs, grad_outputs, direct_grads)`."""
    params = [p for p in block.parameters() if p.requires_grad]
    return _RecomputeBlock.apply(block, shift, mask, x, *params)
