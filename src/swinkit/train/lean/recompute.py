"""Block recomputation in slices of the batch: a recomputed block keeps only its input.

`torch.utils.checkpoint` recomputes a whole block for the whole batch in backward, so while
one block runs backward all its activations exist at once for every image: for Swin's first
stage that is as much memory per image as storing two blocks, and the batch that fits grows
only ~2x. `recompute_block` runs the block's forward and backward over slices of the batch
instead (every Swin block treats images independently: LayerNorm over channels, attention
within windows, drop path per sample), so what recomputation adds is bounded by the slice,
not the batch. Forward and recomputation both run the block's own forward (`forward_stored`,
the definition with the lean kernels installed), so the recomputed output equals the first one bit
for bit. While a recomputation runs (`recomputing()`), the lean kernels may skip work whose result
backward never reads: the slice is small, so attention keeps its probabilities instead of
computing them a third time, and v1's last matmul (fc2) is not run at all (its gradients come
from its input, `g^T gelu(h)`; the recomputed block output's values are never read, only its graph).

Results equal plain training: drop-path masks are drawn once for the batch, in the order the
plain forward draws them, and reused by every slice; the autocast state of the forward is
restored for the recomputation. Only the summation order of weight gradients over slices
differs (fp32 rounding). Blocks with dropout inside fall back to `torch.utils.checkpoint`
(elementwise random masks cannot be re-drawn slice by slice).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ...allocator import reuse_freed_memory

# A slice holds about this many block-input elements (tokens x channels): ~4 MB of fp32 per tensor
# of the block's width; recomputing it materialises ~20 such tensors (qkv, fc1's 4C output, grads).
SLICE_ELEMENTS = 1 << 20


_recomputing = False  # set only inside _RecomputeBlock.backward's slice loop


def recomputing() -> bool:
    """Whether the block forward now running is a recomputation inside backward."""
    return _recomputing


@contextmanager
def _recomputation():
    global _recomputing
    previous, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = previous


def slice_images(tokens_per_image: int, channels: int, elements: int | None = None) -> int:
    """Images per recomputed slice for a block whose input holds `tokens_per_image x channels` values."""
    elements = SLICE_ELEMENTS if elements is None else elements
    return max(1, elements // max(tokens_per_image * channels, 1))


class _RecomputeBlock(torch.autograd.Function):
    """forward(block, shift, mask, x, *params) -> block(x, shift, mask), saving x (and drop-path masks) only.

    The parameters are inputs so that autograd hands out their gradients once per step, summed
    over the slices (what DDP's gradient hooks expect)."""

    @staticmethod
    def forward(ctx, block, shift, mask, x, *params):
        device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        keep = block.drop_path_masks(x)
        step = slice_images(x[0].numel() // x.shape[-1], x.shape[-1])
        if step >= x.shape[0]:
            out = block.forward_stored(x, shift, mask, keep)
        else:
            out = torch.empty_like(x)  # slices' temporaries are reused, the output is not
            with reuse_freed_memory():
                for start in range(0, x.shape[0], step):
                    end = min(start + step, x.shape[0])
                    out[start:end] = block.forward_stored(x[start:end], shift, mask, _slice(keep, start, end))
        ctx.block, ctx.shift, ctx.step = block, shift, step
        ctx.has_keep = [k is not None for k in keep]
        ctx.save_for_backward(x, mask, *(k for k in keep if k is not None))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, *kept = ctx.saved_tensors
        kept = iter(kept)
        keep = tuple(next(kept) if has else None for has in ctx.has_keep)
        params = [p for p in ctx.block.parameters() if p.requires_grad]  # the order forward was given
        wants_x = ctx.needs_input_grad[3]
        # Allocated before the slice loop's heap reuse: it outlives the loop.
        grad_x = torch.empty_like(x) if wants_x else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        enabled, dtype = ctx.autocast
        with reuse_freed_memory():
            for start in range(0, x.shape[0], ctx.step):
                end = min(start + ctx.step, x.shape[0])
                part = x[start:end].detach().requires_grad_(wants_x)
                with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled), \
                        _recomputation():
                    out = ctx.block.forward_stored(part, ctx.shift, mask, _slice(keep, start, end))
                found = list(torch.autograd.grad(out, ([part] if wants_x else []) + params, grad_out[start:end],
                                                 allow_unused=True))
                if wants_x:
                    grad_x[start:end] = found.pop(0)
                for i, grad in enumerate(found):
                    if grad is not None:
                        grads[i] = grad if grads[i] is None else grads[i].add_(grad)
                del out, found
        return (None, None, None, grad_x, *grads)


def _slice(keep, start: int, end: int):
    return tuple(None if k is None else k[start:end] for k in keep)


def recompute_block(block, x: torch.Tensor, shift, mask: torch.Tensor | None) -> torch.Tensor:
    """`block(x, shift, mask)` keeping only `x` for backward (see the module docstring). The block
    provides `drop_path_masks(x)` and `forward_stored(x, shift, mask, drop_masks)`."""
    params = [p for p in block.parameters() if p.requires_grad]
    return _RecomputeBlock.apply(block, shift, mask, x, *params)
