"""How training runs cheaply: a policy installed on a model from outside.

    from swinkit.train import lean
    lean.install(model, plan="none")           # lean saved tensors + oneDNN GEMMs, nothing recomputed
    lean.install(model, plan=["full"] * 4 + ["selective"] * 8)   # per-block recomputation
    lean.plan_of(model); lean.uninstall(model)

The model (`swinkit.models`) says what a block computes; this package decides what training
keeps for backward and which kernels run, by specialising the model's modules in place
(`swinkit.policy`: same parameters and state-dict keys, new `forward`s):

- blocks: the MLP branch and window attention run the memory-lean kernels (`kernels.py`: the
  hand-written gradients of the same branches, keeping the branch input and fc1's output, and
  the qkv projection, instead of every intermediate); the recompute mode of each block decides
  what else is kept: "none"; "selective" = the attention branch is recomputed in backward
  (`torch.utils.checkpoint`); "full" = the block keeps only its input and runs forward and
  backward in slices of the batch (`recompute.py`);
- linear layers: the three matmuls on oneDNN where `swinkit.onednn.uses_onednn` says so (large CPU
  problems where oneDNN measured faster than MKL for the shape);
- the patch embedding keeps only the image; v1 patch merging keeps only the 2x2 gather.

Gradients equal autograd of the plain definition (tests: float64 within 1e-12, fp32 within 1e-6).
The process-level memory settings a training entry point may choose are in `swinkit.allocator`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...models.attention import WindowAttention
from ...models.layers import PatchEmbed, PatchMerging
from ...models.swin import SwinBlock, SwinTransformer
from ...onednn import OneDNNLinear, linear_autograd
from ...policy import plain_class, restore, specialise
from . import kernels
from .recompute import recompute_block, recomputing

MODES = ("none", "selective", "full")


class LeanBlock:
    """A `SwinBlock` that keeps for backward what its `recompute_mode` says (see the package docstring)."""

    recompute_mode = "none"

    def forward(self, x: torch.Tensor, shift: tuple[int, int] = (0, 0), mask: torch.Tensor | None = None,
                drop_masks: tuple = (None, None)):
        if self.recompute_mode != "full" or not torch.is_grad_enabled():
            return self.forward_stored(x, shift, mask, drop_masks)
        if self.training and self.has_dropout():  # elementwise masks cannot be re-drawn per slice
            return checkpoint(self.forward_stored, x, shift, mask, drop_masks, use_reentrant=False)
        return recompute_block(self, x, shift, mask)

    def forward_stored(self, x, shift=(0, 0), mask=None, drop_masks=(None, None)):
        """The definition's forward with the lean kernels: what "full" recomputation repeats."""
        return super().forward(x, shift, mask, drop_masks)

    def attention_branch(self, x, mask, layout=None):
        if self.recompute_mode == "selective" and torch.is_grad_enabled():
            return checkpoint(super().attention_branch, x, mask, layout, use_reentrant=False)
        return super().attention_branch(x, mask, layout)

    def mlp_branch(self, x):
        if self.training and self.mlp.drop.p > 0:  # the lean kernel has no dropout
            return super().mlp_branch(x)
        return kernels.mlp_branch(x, self.norm2, self.mlp, pre_norm=self.version == 1, skip_output=recomputing())


class LeanWindowAttention:
    """Window attention keeping only the qkv projection for backward."""

    def project_qkv(self, x):
        return linear_autograd(x, self.qkv.weight, self.qkv_bias()).chunk(3, dim=-1)

    def attend(self, q, k, v, attn_bias):
        if self.training and self.attn_drop > 0:  # the lean kernel has no dropout
            return super().attend(q, k, v, attn_bias)
        keep_probs = recomputing()  # a slice of the batch: keep the probabilities, not a third softmax
        logit_scale, scale = (self.logit_scale, 1.0) if self.cosine else (None, self.temperature())
        return kernels.window_attention(q, k, v, attn_bias, logit_scale, scale, self.window, self.num_heads,
                                        keep_probs)


class LeanPatchEmbed:
    """Keeps only the image for backward; projection and norm are recomputed (~0.3% of Swin-T's
    FLOPs, run last in backward, when little else is held)."""

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


class LeanPatchMerging:
    """v1: keeps only the 2x2 gather for backward; its LayerNorm is rebuilt there."""

    def reduce(self, x):
        if self.version == 1:
            return kernels.norm_linear(x, self.norm, self.reduction.weight)
        return super().reduce(x)


_MIXINS = ((SwinBlock, LeanBlock), (WindowAttention, LeanWindowAttention), (PatchEmbed, LeanPatchEmbed),
           (PatchMerging, LeanPatchMerging), (nn.Linear, OneDNNLinear))


def install(model: SwinTransformer, plan: str | list[str] = "none") -> SwinTransformer:
    """Install the lean training policy on `model` (in place; idempotent) with a recompute `plan`:
    one mode for every block or a list with one per block (modes: "none", "selective", "full")."""
    for module in model.modules():
        for base, mixin in _MIXINS:
            if issubclass(plain_class(module), base):
                specialise(module, mixin)
                break
    set_plan(model, plan)
    return model


def set_plan(model: SwinTransformer, plan: str | list[str]) -> None:
    """Change the recompute mode of each block of a model `install` was applied to."""
    blocks = model.blocks()
    modes = [plan] * len(blocks) if isinstance(plan, str) else list(plan)
    if len(modes) != len(blocks) or any(m not in MODES for m in modes):
        raise ValueError(f"recompute plan must be one of {MODES} or a list of {len(blocks)} of them, got {plan!r}")
    if not all(isinstance(block, LeanBlock) for block in blocks):
        raise ValueError("set_plan needs a model with the lean policy installed (swinkit.train.lean.install)")
    for block, mode in zip(blocks, modes):
        block.recompute_mode = mode


def plan_of(model: SwinTransformer) -> list[str]:
    """Each block's recompute mode ("none" everywhere for a model without the policy)."""
    return [getattr(block, "recompute_mode", "none") for block in model.blocks()]


def is_installed(model: nn.Module) -> bool:
    return any(isinstance(module, LeanBlock) for module in model.modules())


def uninstall(model: SwinTransformer) -> SwinTransformer:
    """Back to the plain definition (in place)."""
    for block in model.blocks():
        block.__dict__.pop("recompute_mode", None)
    return restore(model)


__all__ = ["MODES", "install", "is_installed", "plan_of", "set_plan", "uninstall"]
